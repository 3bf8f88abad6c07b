"""KV memory experiments for ``quasar_jax.serve``: prefix caching, multi-turn chat, capacity.

Each workload starts servers in this process (uvicorn on 127.0.0.1, a free port; the demo model in
float32 unless ``--model``) and sends token-id prompts over HTTP (streaming ``/v1/completions``,
greedy, ``ignore_eos`` so every request makes its full budget), side by side in one run:

* ``shared-prefix``: ``--requests`` requests, one ``--prefix-tokens`` system prompt plus distinct
  ~32-token questions, ``--output-tokens`` each, at ``--concurrency``; prefix caching on and off,
  speculation off and auto: mean TTFT, output throughput, prompt-token hit rate (/metrics).
* ``multi-turn``: ``--conversations`` chats of ``--turns`` turns (each turn: the whole
  conversation so far + its answer + a new ~32-token question), the conversations concurrent,
  their turns in sequence: the hit rate of every turn.
* ``capacity``: the KV memory of ``--dense-slots`` dense slots of ``--capacity-len`` positions
  (bfloat16 K/V); requests of uniform 64-512 total tokens: how many are resident at once in the
  dense cache, in bfloat16 pages and in int8 pages (the server's allocator, no model run: on the
  CPU admission is prefill-bound, so a live peak measures prefill speed, not memory).

Writes ``OUT.json`` (every figure) and ``OUT.md`` (the tables).

    python scripts/serve_kv_experiment.py --workloads shared-prefix multi-turn capacity --out docs/results/serving_kv_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_experiment import scrape  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--workloads", nargs="+", choices=["shared-prefix", "multi-turn", "capacity"],
                   default=["shared-prefix", "multi-turn", "capacity"])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--dense-slots", type=int, default=16)
    p.add_argument("--capacity-len", type=int, default=2048)
    p.add_argument("--capacity-requests", type=int, default=192)
    p.add_argument("--capacity-output", type=int, default=16)
    p.add_argument("--num-draft", type=int, default=5)
    p.add_argument("--chunk-steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default=f"{platform.machine()} CPU, {os.cpu_count()} cores")
    p.add_argument("--out", default="runs/serving_kv")
    return p.parse_args(argv)


class Server:
    """One server of the demo model for a workload (stopped on exit)."""

    def __init__(self, model, tok, stop_ids, **cfg):
        from quasar_jax.serving.server import ServeConfig, ServerThread, build
        from quasar_jax.speculative.drafters import make_drafter

        self.cfg = ServeConfig(drafter=make_drafter("ngram", num_draft=cfg.pop("num_draft")), max_queue=1024, **cfg)
        t0 = time.perf_counter()
        self.app, self.api, self.scheduler = build(model, tok, self.cfg, model_name="m", stop_ids=stop_ids)
        self.compile_s = time.perf_counter() - t0
        self.thread = ServerThread(self.app).start()
        self.url = self.thread.url

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.thread.stop()
        self.scheduler.stop()


async def one(client, ids, max_tokens) -> dict:
    body = {"model": "m", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            first, last = first or now, now
            text += [c.get("text", "") for c in chunk.get("choices", [])]
            usage = chunk.get("usage") or usage
    return {"ttft": first - t0, "latency": last - t0, "tokens": usage["completion_tokens"], "text": "".join(text)}


async def run_all(url, prompts, max_tokens, concurrency) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        sem = asyncio.Semaphore(concurrency)

        async def gated(ids):
            async with sem:
                return await one(c, ids, max_tokens)
        t0 = time.perf_counter()
        out = await asyncio.gather(*(gated(p) for p in prompts))
        return list(out), time.perf_counter() - t0


def hits(before: dict, after: dict) -> dict:
    q = after.get("quasar_kv_prefix_queried_tokens", 0) - before.get("quasar_kv_prefix_queried_tokens", 0)
    h = after.get("quasar_kv_prefix_hit_tokens", 0) - before.get("quasar_kv_prefix_hit_tokens", 0)
    return {"queried_tokens": q, "hit_tokens": h, "hit_rate": h / q if q else None,
            "evictions": after.get("quasar_kv_evictions", 0) - before.get("quasar_kv_evictions", 0),
            "preemptions": after.get("quasar_kv_preemptions", 0) - before.get("quasar_kv_preemptions", 0)}


def random_ids(rng, n, vocab):
    return [rng.randrange(10, vocab) for _ in range(n)]


def shared_prefix(args, model, tok, stop_ids, vocab) -> list[dict]:
    rng = random.Random(args.seed)
    system = random_ids(rng, args.prefix_tokens, vocab)
    prompts = [system + random_ids(rng, rng.randint(24, 40), vocab) for _ in range(args.requests)]
    max_len = args.prefix_tokens + 64 + args.output_tokens + 64
    rows = []
    for speculation in (0, "auto"):
        for caching in (False, True):
            with Server(model, tok, stop_ids, slots=args.slots, max_len=max_len, chunk_steps=args.chunk_steps,
                        speculation=speculation, num_draft=args.num_draft, prefix_caching=caching) as srv:
                asyncio.run(run_all(srv.url, [random_ids(rng, 40, vocab)], 4, 1))  # warm-up, no shared prefix
                before, load0 = scrape(srv.url), os.getloadavg()
                res, wall = asyncio.run(run_all(srv.url, prompts, args.output_tokens, args.concurrency))
                row = {"speculation": "off" if speculation == 0 else speculation, "prefix_caching": caching,
                       "mean_ttft_s": float(np.mean([r["ttft"] for r in res])),
                       "output_tokens_per_s": sum(r["tokens"] for r in res) / wall, "wall_s": wall,
                       **hits(before, scrape(srv.url)), "compile_s": srv.compile_s,
                       "loadavg": [load0, os.getloadavg()]}
                print(json.dumps({"workload": "shared-prefix", **row}), flush=True)
                rows.append(row)
    return rows


def multi_turn(args, model, tok, stop_ids, vocab) -> list[dict]:
    rng = random.Random(args.seed + 1)
    convs = [random_ids(rng, rng.randint(192, 320), vocab) for _ in range(args.conversations)]  # system + turn 1
    max_len = 320 + args.turns * (48 + args.output_tokens) + 64
    rows = []
    with Server(model, tok, stop_ids, slots=args.slots, max_len=max_len, chunk_steps=args.chunk_steps,
                speculation="auto", num_draft=args.num_draft) as srv:
        for turn in range(1, args.turns + 1):
            before = scrape(srv.url)
            res, wall = asyncio.run(run_all(srv.url, convs, args.output_tokens, args.conversations))
            row = {"turn": turn, "prompt_tokens_mean": float(np.mean([len(c) for c in convs])),
                   **hits(before, scrape(srv.url)), "wall_s": wall}
            print(json.dumps({"workload": "multi-turn", **row}), flush=True)
            rows.append(row)
            # The answer (re-tokenized from its text) and a new question continue each conversation.
            convs = [c + tok(r["text"], add_special_tokens=False)["input_ids"] + random_ids(rng, 32, vocab)
                     for c, r in zip(convs, res)]
    return rows


def capacity(args, model, tok, stop_ids, vocab) -> list[dict]:
    """Requests resident at once in the KV memory of ``--dense-slots x --capacity-len`` bfloat16
    K/V: the dense cache holds ``--dense-slots`` whatever their lengths; pages hold each request's
    total tokens plus one chunk's reach (``serving.kv_pages.chunk_reach`` for K = ``--num-draft``,
    N = ``--chunk-steps``), counted with the server's own allocator (``quasar_jax.paging``) on
    uniform 64-512-token requests until it runs out."""
    from quasar_jax.model.paged_kv_cache import cache_bytes_per_token
    from quasar_jax.paging import OutOfPages, PageTables

    rng = random.Random(args.seed + 2)
    totals = [rng.randint(64, 512) for _ in range(4096)]
    memory = args.dense_slots * args.capacity_len * cache_bytes_per_token(model.config, "bfloat16")
    k, n, page = args.num_draft, args.chunk_steps, 16
    reach = (n - 1) * (k + 1) + k + 1
    rows = [{"layout": "dense", "kv_dtype": "bfloat16", "kv_bytes": int(memory), "kv_pages": None,
             "requests_resident": args.dense_slots, "mean_total_tokens": float(np.mean(totals))}]
    for kv_dtype in ("bfloat16", "int8"):
        pages = int(memory // (page * cache_bytes_per_token(model.config, kv_dtype)))
        tables = PageTables(pages, page, len(totals), -(-args.capacity_len // page), prefix_caching=False)
        fit = 0
        for row, total in enumerate(totals):
            prompt = random_ids(rng, total - args.output_tokens // 2, vocab)
            tables.admit(row, prompt, reusable=len(prompt) - 1)
            try:
                tables.reserve(row, 0, min(total - 1 + reach, args.capacity_len))
            except OutOfPages:
                break
            fit += 1
        rows.append({"layout": "paged", "kv_dtype": kv_dtype, "kv_bytes": int(memory), "kv_pages": pages,
                     "requests_resident": fit, "mean_total_tokens": float(np.mean(totals[:fit]))})
    for r in rows:
        r["vs_dense"] = r["requests_resident"] / args.dense_slots
        print(json.dumps({"workload": "capacity", **r}), flush=True)
    return rows


def tables(report: dict) -> str:
    out = [f"Machine: {report['machine']}; demo model float32; {report['date']}.", ""]
    if "shared-prefix" in report:
        out += ["| speculation | prefix caching | mean TTFT (s) | output tok/s | prompt-token hit rate |",
                "| --- | --- | --- | --- | --- |"]
        for r in report["shared-prefix"]:
            out.append(f"| {r['speculation']} | {'on' if r['prefix_caching'] else 'off'} | {r['mean_ttft_s']:.3f} | "
                       f"{r['output_tokens_per_s']:.1f} | {r['hit_rate'] or 0:.3f} |")
        out.append("")
    if "multi-turn" in report:
        out += ["| turn | mean prompt tokens | prompt-token hit rate |", "| --- | --- | --- |"]
        for r in report["multi-turn"]:
            out.append(f"| {r['turn']} | {r['prompt_tokens_mean']:.0f} | {r['hit_rate'] or 0:.3f} |")
        out.append("")
    if "capacity" in report:
        out += ["| layout | KV dtype | KV pages | requests resident | vs dense |", "| --- | --- | --- | --- | --- |"]
        for r in report["capacity"]:
            out.append(f"| {r['layout']} | {r['kv_dtype']} | {r['kv_pages'] or '-'} | {r['requests_resident']} | "
                       f"{r['vs_dense']:.2f}x |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import quasar_jax as qj
    from quasar_jax.cli.prompts import stop_ids_of
    from quasar_jax.weights.loading import resolve_model_dir

    model, tok = qj.load(args.model, dtype="float32")
    stop_ids = stop_ids_of(tok, resolve_model_dir(args.model))
    vocab = model.config.vocab_size
    report = {"machine": args.machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "args": vars(args)}
    runners = {"shared-prefix": shared_prefix, "multi-turn": multi_turn, "capacity": capacity}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.with_suffix(".json").exists():  # workloads of an earlier run are kept (rerun one alone)
        report = {**json.loads(out.with_suffix(".json").read_text()), **report}
    for name in args.workloads:  # written after each workload
        report[name] = runners[name](args, model, tok, stop_ids, vocab)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(tables(report))
    print(tables(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
