"""The API dialect's costs and exactness: logprobs and penalties in the serving loop, measured.

Three parts, one process (run it under the exclusive CPU lock):

1. **Serving throughput** (demo model, float32, n-gram K = --num-draft, --slots slots), measured
   twice: on the device (``SlotEngine.chunk`` calls only, every slot holding one of the prompts,
   no stop ids, so every configuration generates the same tokens count) and over HTTP (every
   request at once, streaming, greedy, ``ignore_eos``: client, event loop, detokenization and
   JSON included), each against
   * ``before``: a server whose loop has no logits stage (``LogitsSpec()``: the program before it),
   * ``plain``: the shipped server (``SERVING_SPEC``: penalties and 20 logprobs compiled in) with
     plain requests,
   * ``logprobs``: the shipped server, every request with ``logprobs=5``,
   * ``stage``: the shipped server, every request with ``min_tokens=1``: the whole processing stage
     (penalty counts included) runs every step but changes nothing (no stop ids under
     ``ignore_eos``), so this is its cost at an unchanged tau,
   * ``penalties``: the shipped server, every request with presence / frequency / repetition
     penalties (which also change the text, hence the n-gram drafts' acceptance);
   interleaved (before, plain, logprobs, stage, penalties, before, ...) for --repeats rounds; the
   median tokens/s of each and its ratio to ``before``.
2. **Logprobs against transformers** (float32): generation logprobs and echo (prompt) logprobs
   returned by the shipped server for --num-prompts prompts, max |difference| to
   ``torch.log_softmax`` of ``Qwen3ForCausalLM``.
3. **Greedy with penalties = autoregressive**: ``Engine.generate`` with penalties, autoregressive
   vs the n-gram chain and a tree, on the same prompts: exact-match rate and tau.

    flock -x /work/cpu.lock python scripts/bench_api.py --machine "CPU, 2 cores, shared" \\
        --out docs/results/api_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np

PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1)
CONFIGS = {"before": {}, "plain": {}, "logprobs": {"logprobs": 5}, "stage": {"min_tokens": 1}, "penalties": PENALTIES}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", nargs="+", default=sorted(glob.glob("../shared/specbench/*.jsonl")))
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--num-draft", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-prompts", type=int, default=8, help="prompts for parts 2 and 3")
    p.add_argument("--machine", required=True)
    p.add_argument("--out", default="runs/api.json")
    return p.parse_args(argv)


def prompts_of(args, tokenizer, n: int) -> list[str]:
    from quasar_jax.cli.prompts import load_questions

    out = []
    for q in load_questions(args.questions):
        if len(tokenizer(q.text)["input_ids"]) + args.max_tokens <= args.max_len:
            out.append(q.text)
    return out[::max(1, len(out) // n)][:n]


# ----------------------------------------------------------------------------- 1. throughput
def _device_run(engine, ids: list[list[int]], max_tokens: int, extra: dict) -> dict:
    """Fill every slot with one prompt, run chunks until all are done; time the chunks only."""
    from quasar_jax.serving.slots import stage_prompt
    from quasar_jax.speculative.sampling import SamplingParams

    engine.reset()
    sampling = SamplingParams(**extra)
    for slot in range(engine.b):
        prompt = ids[slot % len(ids)]
        stage_prompt(engine, prompt)
        engine.admit(slot, engine.row_inputs(max_tokens, (), sampling), engine.key_data(sampling, 0))
    wall, tokens = 0.0, 0
    while True:
        t0 = time.perf_counter()
        res = engine.chunk(logprobs=sampling.logprobs is not None)
        wall += time.perf_counter() - t0
        tokens += int(res.appended.sum())
        if res.done.all():
            return {"tokens": tokens, "tau": tokens / max(int(res.steps.sum()), 1), "wall_s": wall,
                    "tokens_per_s": tokens / wall}


def _summary(runs: dict) -> dict:
    median = {n: statistics.median(x["tokens_per_s"] for x in rs) for n, rs in runs.items()}
    return {"runs": runs, "median_tokens_per_s": median, "ratio_to_before": {n: median[n] / median["before"]
                                                                              for n in median},
            "median_tau": {n: statistics.median(x["tau"] for x in rs) for n, rs in runs.items()}}


async def _load(url: str, prompts: list[str], max_tokens: int, extra: dict) -> tuple[int, int, float]:
    async def one(client, prompt):
        body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, **extra}
        usage = None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
        return usage["completion_tokens"], usage["verify_steps"]

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(client, p) for p in prompts))
        return sum(d[0] for d in done), sum(d[1] for d in done), time.perf_counter() - t0


def throughput(args, model, tokenizer, stop_ids) -> dict:
    from quasar_jax.serving.api import Api, create_app
    from quasar_jax.serving.scheduler import Scheduler
    from quasar_jax.serving.server import ServerThread
    from quasar_jax.serving.slots import SERVING_SPEC, SlotEngine
    from quasar_jax.speculative.drafters import make_drafter
    from quasar_jax.speculative.logits import LogitsSpec

    prompts = prompts_of(args, tokenizer, args.num_requests)
    engines, compile_s = {}, {}
    for name, spec in (("before", LogitsSpec()), ("shipped", SERVING_SPEC)):
        t0 = time.perf_counter()
        engines[name] = SlotEngine(model, make_drafter("ngram", num_draft=args.num_draft), "float",
                                   slots=args.slots, max_len=args.max_len, chunk_steps=8,
                                   prefill_buckets=(32, 64, 128), spec=spec)
        compile_s[name] = time.perf_counter() - t0
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    device = {name: [] for name in CONFIGS}
    for name, extra in CONFIGS.items():  # warm-up
        _device_run(engines["before" if name == "before" else "shipped"], ids, 4, extra)
    for r in range(args.repeats):
        for name, extra in CONFIGS.items():
            device[name].append(_device_run(engines["before" if name == "before" else "shipped"], ids,
                                            args.max_tokens, extra))
            print(json.dumps({"device round": r, "config": name, **device[name][-1]}), flush=True)
    servers = {}
    for name, engine in engines.items():
        scheduler = Scheduler(engine, max_queue=max(64, len(prompts))).start()
        servers[name] = ServerThread(create_app(Api(scheduler, tokenizer, model_name="m", stop_ids=stop_ids),
                                                on_shutdown=scheduler.stop)).start()
    runs = {name: [] for name in CONFIGS}
    try:
        for name, extra in CONFIGS.items():  # warm-up (first-request costs, tokenizer caches)
            asyncio.run(_load(servers["before" if name == "before" else "shipped"].url, prompts[:2], 4, extra))
        for r in range(args.repeats):
            for name, extra in CONFIGS.items():
                tokens, steps, wall = asyncio.run(_load(servers["before" if name == "before" else "shipped"].url,
                                                        prompts, args.max_tokens, extra))
                runs[name].append({"tokens": tokens, "tau": tokens / steps, "wall_s": wall,
                                   "tokens_per_s": tokens / wall})
                print(json.dumps({"round": r, "config": name, **runs[name][-1]}), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return {"requests": len(prompts), "max_tokens": args.max_tokens, "slots": args.slots,
            "num_draft": args.num_draft, "compile_s": compile_s, "configs": CONFIGS,
            "device": _summary(device), "http": _summary(runs)}


# ----------------------------------------------------------------------------- 2. logprobs
def agreement(args, model, tokenizer, stop_ids) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from quasar_jax.serving.server import ServeConfig, ServerThread, build
    from quasar_jax.speculative.drafters import make_drafter
    from quasar_jax.weights.loading import resolve_model_dir

    hf = AutoModelForCausalLM.from_pretrained(resolve_model_dir("demo"), dtype=torch.float32).eval()
    cfg = ServeConfig(drafter=make_drafter("ngram", num_draft=args.num_draft), slots=4, max_len=args.max_len)
    app, _, scheduler = build(model, tokenizer, cfg, model_name="m", stop_ids=stop_ids)
    server = ServerThread(app).start()
    worst = {"generation": 0.0, "echo": 0.0, "top5": 0.0}
    tokens = {"generation": 0, "echo": 0}
    try:
        for prompt in prompts_of(args, tokenizer, args.num_prompts):
            body = {"model": "m", "prompt": prompt, "max_tokens": 32, "temperature": 0, "logprobs": 5,
                    "echo": True, "return_tokens_as_token_ids": True}
            lp = httpx.post(server.url + "/v1/completions", json=body, timeout=600).json()["choices"][0]["logprobs"]
            ids = [int(t.split(":")[1]) for t in lp["tokens"]]
            n_prompt = len(tokenizer(prompt)["input_ids"])
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1).numpy()
            want = ref[np.arange(len(ids) - 1), ids[1:]]
            got = np.asarray(lp["token_logprobs"][1:], np.float64)
            for kind, sl in (("echo", slice(0, n_prompt - 1)), ("generation", slice(n_prompt - 1, None))):
                worst[kind] = max(worst[kind], float(np.max(np.abs(got[sl] - want[sl]))))
                tokens[kind] += len(got[sl])
            for j, top in enumerate(lp["top_logprobs"][1:]):
                vals = sorted(top.values(), reverse=True)[:5]
                worst["top5"] = max(worst["top5"], float(np.max(np.abs(np.asarray(vals) - np.sort(ref[j])[::-1][:5]))))
    finally:
        server.stop()
    return {"max_abs_difference": worst, "tokens_compared": tokens, "dtype": "float32"}


# ----------------------------------------------------------------------------- 3. penalties
def penalties_equality(args, model, tokenizer) -> dict:
    import quasar_jax as qj
    from quasar_jax.speculative.sampling import SamplingParams

    engine = qj.Engine(model)
    ids = [tokenizer(p)["input_ids"] for p in prompts_of(args, tokenizer, args.num_prompts)]
    settings = [SamplingParams(**PENALTIES), SamplingParams(repetition_penalty=1.3),
                SamplingParams(presence_penalty=1.0, frequency_penalty=-0.5), SamplingParams(frequency_penalty=-0.7)]
    rows = [settings[i % len(settings)] for i in range(len(ids))]
    out = {}
    ar = engine.generate(ids, qj.GenerationConfig(max_new_tokens=64, drafter="none"), sampling=rows)
    plain = engine.generate(ids, qj.GenerationConfig(max_new_tokens=64, drafter="none")).tokens
    out["penalties_changed_rows"] = sum(a != b for a, b in zip(ar.tokens, plain))
    for name, kw in (("chain", dict(num_draft=args.num_draft)),
                     ("tree", dict(num_draft=args.num_draft, num_candidates=4, tree_nodes=16))):
        sd = engine.generate(ids, qj.GenerationConfig(max_new_tokens=64, **kw), sampling=rows)
        out[name] = {"exact_match_rows": sum(a == b for a, b in zip(ar.tokens, sd.tokens)), "rows": len(ids),
                     "tokens": sum(map(len, sd.tokens)), "tau": sd.batch_stats.mean_accepted}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import quasar_jax as qj
    from quasar_jax.bench.report import loadavg, machine_info
    from quasar_jax.cli.prompts import stop_ids_of
    from quasar_jax.weights.loading import resolve_model_dir

    model, tokenizer = qj.load("demo", dtype=jnp.float32)
    stop_ids = stop_ids_of(tokenizer, resolve_model_dir("demo"))
    report = {"machine": args.machine, "machine_info": machine_info(), "load_before": os.getloadavg(),
              "throughput": throughput(args, model, tokenizer, stop_ids),
              "logprobs_vs_transformers": agreement(args, model, tokenizer, stop_ids),
              "greedy_penalties_vs_autoregressive": penalties_equality(args, model, tokenizer),
              "load_after": os.getloadavg(), "loadavg": loadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    d, h = report["throughput"]["device"], report["throughput"]["http"]
    print("| config | device tok/s | vs before | HTTP tok/s | vs before | tau |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n in CONFIGS:
        print(f"| {n} | {d['median_tokens_per_s'][n]:.1f} | {d['ratio_to_before'][n]:.3f} | "
              f"{h['median_tokens_per_s'][n]:.1f} | {h['ratio_to_before'][n]:.3f} | {h['median_tau'][n]:.2f} |")
    print(json.dumps({k: report[k] for k in ("logprobs_vs_transformers", "greedy_penalties_vs_autoregressive")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
